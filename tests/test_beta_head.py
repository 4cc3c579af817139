"""BetaHead: the formula for every option, w as parameter or buffer, auto init, normalisation, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lbdpo.beta_head import BetaHead, BetaHeadConfig

H = 16


@pytest.fixture(autouse=True)
def seeded():
    """Every test builds its heads from the same RNG state, whatever ran before it in the process (a random
    init can saturate tanh for every input, which some assertions below would misread)."""
    torch.manual_seed(0)


def inputs(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, H, generator=g) * 3
    log_ppl = torch.rand(batch, generator=g) * 4 + 0.5
    return h, log_ppl


def expected_ppl_term(kind, log_ppl):
    return {
        "log_ppl": log_ppl,
        "ppl": log_ppl.exp(),
        "none": torch.ones_like(log_ppl),
        "inverse_log_ppl": 1 / (1 + log_ppl),
    }[kind]


def nn_out(head, h):
    net = head.context_net
    if isinstance(net, torch.nn.Linear):
        return (h @ net.weight.T + net.bias).squeeze(-1)
    lin1, _, _, lin2 = net
    return (torch.nn.functional.gelu(h @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias).squeeze(-1)


@pytest.mark.parametrize("ppl_transform", ["log_ppl", "ppl", "none", "inverse_log_ppl"])
@pytest.mark.parametrize("net", ["linear", "mlp"])
@pytest.mark.parametrize("epsilon", [0.0, 0.3])
def test_beta_equals_formula(ppl_transform, net, epsilon):
    cfg = BetaHeadConfig(hidden_size=H, context_net_type=net, epsilon=epsilon, w_init=0.07,
                         ppl_transform=ppl_transform, init_std=0.5)
    head = BetaHead(cfg)
    h, log_ppl = inputs()
    beta, details = head(h, log_ppl=log_ppl, return_details=True)
    f = 1 + epsilon * torch.tanh(nn_out(head, h)) if epsilon else torch.ones(6)
    expected = 0.07 * expected_ppl_term(ppl_transform, log_ppl) * f
    torch.testing.assert_close(beta, expected, rtol=1e-5, atol=1e-7)
    assert beta.shape == (6,)
    # f in [1-ε, 1+ε]; ε = 0 gives exactly 1
    assert torch.all(details["f"] >= 1 - epsilon) and torch.all(details["f"] <= 1 + epsilon)
    if epsilon == 0:
        assert torch.all(details["f"] == 1)
        # no NN at all: DDP would fail on parameters that never receive a gradient
        assert [n for n, _ in head.named_parameters()] == ["w"]
    else:
        assert details["f"].std() > 0, "f must depend on h"
    # the ppl= argument (perplexity) gives the same β as log_ppl=
    torch.testing.assert_close(head(h, ppl=log_ppl.exp()), beta, rtol=1e-5, atol=1e-7)


def test_f_saturates_within_bounds():
    head = BetaHead(BetaHeadConfig(hidden_size=H, epsilon=0.2, w_init=1.0, init_std=10.0))
    h, log_ppl = inputs(batch=64)
    _, d = head(h * 100, log_ppl=log_ppl, return_details=True)
    assert d["f"].min() >= 0.8 - 1e-6 and d["f"].max() <= 1.2 + 1e-6
    assert d["f"].min() < 0.81 and d["f"].max() > 1.19  # it really reaches both ends


def test_w_trainable_is_parameter_and_gets_gradient():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.1, w_trainable=True))
    assert any(p is head.w for p in head.parameters())
    h, log_ppl = inputs()
    head(h, log_ppl=log_ppl).sum().backward()
    assert head.w.grad is not None and head.w.grad.abs() > 0
    assert head.context_net.weight.grad.abs().sum() > 0


def test_w_fixed_is_buffer_without_gradient():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.1, w_trainable=False))
    assert all(p is not head.w for p in head.parameters())
    assert "w" in dict(head.named_buffers()) and "w" in head.state_dict()
    assert not head.w.requires_grad
    h, log_ppl = inputs()
    head(h, log_ppl=log_ppl).sum().backward()
    assert head.w.grad is None and head.w.item() == pytest.approx(0.1)


def test_auto_w_init_gives_target_mean_on_first_batch_only():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", target_beta=0.25, epsilon=0.3, init_std=0.5))
    h, log_ppl = inputs(batch=8)
    beta = head(h, log_ppl=log_ppl)
    assert beta.mean().item() == pytest.approx(0.25, rel=1e-5)
    w_after_first = head.w.item()
    h2, log_ppl2 = inputs(batch=8, seed=1)
    head(h2, log_ppl=log_ppl2)
    assert head.w.item() == w_after_first, "auto init must run once"
    # the state survives a state_dict round trip (resume must not re-initialise)
    fresh = BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", target_beta=0.25, epsilon=0.3))
    fresh.load_state_dict(head.state_dict())
    assert bool(fresh.w_initialized) and fresh.w.item() == w_after_first


def test_batch_mean_normalisation():
    head = BetaHead(BetaHeadConfig(hidden_size=H, normalize="batch_mean", target_beta=0.1, epsilon=0.3,
                                   init_std=0.5, w_init=3.0))
    h, log_ppl = inputs()
    beta = head(h, log_ppl=log_ppl)
    assert beta.mean().item() == pytest.approx(0.1, rel=1e-5)
    f = 1 + 0.3 * torch.tanh(nn_out(head, h))
    g = log_ppl * f
    torch.testing.assert_close(beta, 0.1 * g / g.mean(), rtol=1e-5, atol=1e-7)
    beta.sum().backward()
    assert head.w.grad is None or head.w.grad.abs() < 1e-6  # w cancels out
    assert "w" not in dict(head.named_parameters())  # so it is not trained (Adam would amplify float noise)


def test_w_prior_penalty():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.1, w_prior_weight=2.0))
    assert head.regularization_loss().item() == 0.0
    with torch.no_grad():
        head.w.fill_(0.4)
    assert head.regularization_loss().item() == pytest.approx(2.0 * math.log(4.0) ** 2, rel=1e-5)
    head.regularization_loss().backward()
    assert head.w.grad > 0  # pulls w back down
    assert BetaHead(BetaHeadConfig(hidden_size=H, w_prior_weight=0.0, w_init=0.1)).regularization_loss() == 0


def test_fixed_mode_is_constant():
    head = BetaHead(BetaHeadConfig(mode="fixed", beta=0.3))
    assert list(head.parameters()) == []
    h, log_ppl = inputs()
    beta = head(h, log_ppl=log_ppl)
    assert beta.tolist() == pytest.approx([0.3] * 6)


def test_detach_flags_control_gradient_into_policy():
    h, log_ppl = inputs()
    for detach in (True, False):
        hh, lp = h.clone().requires_grad_(), log_ppl.clone().requires_grad_()
        head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.1, epsilon=0.3, detach_hidden=detach,
                                       detach_ppl=detach))
        head(hh, log_ppl=lp).sum().backward()
        assert (hh.grad is None) == detach and (lp.grad is None) == detach


def test_auto_w_init_waits_for_a_finite_batch():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", target_beta=0.2, epsilon=0.0))
    assert head(torch.zeros(2, H), log_ppl=torch.tensor([float("nan"), 2.0])).isnan().any()
    assert not bool(head.w_initialized) and head.w.item() == 1.0
    beta = head(torch.zeros(2, H), log_ppl=torch.tensor([1.0, 3.0]))
    assert bool(head.w_initialized) and beta.mean().item() == pytest.approx(0.2)


def test_clamps_and_nan_input():
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=1.0, beta_min=0.5, beta_max=2.0, epsilon=0.0))
    beta = head(torch.zeros(3, H), log_ppl=torch.tensor([0.1, 1.0, 5.0]))
    assert beta.tolist() == pytest.approx([0.5, 1.0, 2.0])
    # NaN is not an error here: it flows into β (and the loss), where the trainer's guard skips the step
    beta = head(torch.zeros(2, H), log_ppl=torch.tensor([1.0, float("nan")]))
    assert beta[0].item() == pytest.approx(1.0) and beta[1].isnan()
    with pytest.raises(ValueError, match="exactly one"):
        head(torch.zeros(2, H))


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"epsilon": 1.0}, "beta_head.epsilon"),
        ({"epsilon": -0.1}, "beta_head.epsilon"),
        ({"w_init": -0.5}, "beta_head.w_init"),
        ({"w_init": 0.0}, "beta_head.w_init"),
        ({"w_init": "big"}, "beta_head.w_init"),
        ({"context_net_type": "transformer"}, "beta_head.context_net_type"),
        ({"ppl_transform": "sqrt"}, "beta_head.ppl_transform"),
        ({"normalize": "softmax"}, "beta_head.normalize"),
        ({"w_param": "exp"}, "beta_head.w_param"),
        ({"mode": "dynamic"}, "beta_head.mode"),
        ({"mode": "fixed", "beta": 0.0}, "beta_head.beta"),
        ({"beta_min": 1.0, "beta_max": 0.5}, "beta_head.beta_min"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        BetaHeadConfig(hidden_size=H, **overrides)


def test_from_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="epsilonn"):
        BetaHeadConfig.from_mapping({"epsilonn": 0.1}, hidden_size=H)
    assert BetaHeadConfig.from_mapping({"epsilon": 0.2}, hidden_size=H).epsilon == 0.2


# --------------------------------------------------------------------------------------------------
# the log-PPL approximation head (use_ppl_approx)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", ["linear", "mlp"])
def test_ppl_approx_head_formula_init_and_exact_beta(net):
    torch.manual_seed(0)
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.05, epsilon=0.3, use_ppl_approx=True, ppl_net_type=net,
                                   init_std=0.3))
    h, log_ppl = inputs()
    beta, d = head(h, log_ppl=log_ppl, return_details=True)
    approx = d["log_ppl_approx"]
    # the first batch sets the output bias so that mean ℓ̂ = mean log PPL; the shape of ℓ̂ comes from h alone
    assert approx.mean().item() == pytest.approx(log_ppl.mean().item(), abs=1e-5)
    ln = torch.nn.functional.layer_norm(h, (H,))
    manual = head.ppl_net[1](ln).squeeze(-1)
    torch.testing.assert_close(approx, manual, atol=1e-5, rtol=1e-5)
    f = 1 + 0.3 * torch.tanh(nn_out(head, h))
    beta_min = head.config.beta_min  # ℓ̂ < 0 gives T = 0, so β sits at the clamp
    torch.testing.assert_close(beta, (0.05 * approx.clamp(min=0) * f).clamp(min=beta_min), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(d["beta_exact"], 0.05 * log_ppl * f, atol=1e-6, rtol=1e-5)
    # initialised once: a second batch is not shifted
    h2, lp2 = inputs(seed=1)
    _, d2 = head(h2, log_ppl=lp2 + 10, return_details=True)
    assert d2["log_ppl_approx"].mean().item() < (lp2 + 10).mean().item() - 5


def test_ppl_approx_loss_trains_only_the_approximation():
    torch.manual_seed(0)
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.05, epsilon=0.3, use_ppl_approx=True,
                                   ppl_approx_loss_weight=2.0))
    h, log_ppl = inputs()
    h.requires_grad_()
    beta, d = head(h, log_ppl=log_ppl, return_details=True)
    aux = head.auxiliary_loss(log_ppl, d["log_ppl_approx"])
    assert aux.item() == pytest.approx(2.0 * ((d["log_ppl_approx"] - log_ppl) ** 2).mean().item(), rel=1e-6)
    aux.backward()
    assert h.grad is None and head.context_net.weight.grad is None and head.w.grad is None
    assert head.ppl_net[1].weight.grad.abs().sum() > 0
    assert head.auxiliary_loss(log_ppl, None).item() == 0.0
    # and β's gradient never reaches the approximation (it uses ℓ̂ detached)
    head.zero_grad()
    beta.sum().backward()
    assert head.ppl_net[1].weight.grad is None or head.ppl_net[1].weight.grad.abs().sum() == 0


def test_ppl_approx_learns_a_function_of_h():
    torch.manual_seed(0)
    head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.05, use_ppl_approx=True, ppl_net_type="mlp"))
    direction = torch.randn(H)
    opt = torch.optim.Adam(head.ppl_net.parameters(), lr=1e-2)
    h_test = torch.randn(256, H)
    target = lambda h: 3 + torch.tanh(torch.nn.functional.layer_norm(h, (H,)) @ direction / 4)  # noqa: E731
    for _ in range(300):
        h = torch.randn(64, H)
        _, d = head(h, log_ppl=target(h), return_details=True)
        opt.zero_grad()
        head.auxiliary_loss(target(h), d["log_ppl_approx"]).backward()
        opt.step()
    from lbdpo.metrics import ppl_approx_metrics

    with torch.no_grad():
        beta, d = head(h_test, log_ppl=target(h_test), return_details=True)
    m = ppl_approx_metrics({"log_ppl": target(h_test), "log_ppl_approx": d["log_ppl_approx"], "beta": beta,
                            "beta_exact": d["beta_exact"]})
    assert m["ppl_approx/r2"] > 0.9 and m["ppl_approx/mae"] < 0.1 and m["ppl_approx/spearman_beta"] > 0.9


def test_spearman_matches_brute_force():
    from lbdpo.metrics import spearman

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, generator=g), torch.randn(30, generator=g)
    y = x + 0.7 * y
    rank = lambda v: {i: r for r, i in enumerate(sorted(range(len(v)), key=lambda i: v[i]))}  # noqa: E731
    rx, ry = rank(x.tolist()), rank(y.tolist())
    n = len(x)
    brute = 1 - 6 * sum((rx[i] - ry[i]) ** 2 for i in range(n)) / (n * (n * n - 1))
    assert spearman(x, y) == pytest.approx(brute, abs=1e-9)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_ppl_approx_bad_config():
    with pytest.raises(ValueError, match="beta_head.ppl_net_type"):
        BetaHeadConfig(hidden_size=H, use_ppl_approx=True, ppl_net_type="rnn")
    with pytest.raises(ValueError, match="ppl_approx_loss_weight"):
        BetaHeadConfig(hidden_size=H, use_ppl_approx=True, ppl_approx_loss_weight=0.0)


def test_w_is_one_element_and_loads_from_a_0d_checkpoint():
    """w is 1-D (FSDP2 cannot shard a 0-d parameter); checkpoints written when it was 0-d still load."""
    head = BetaHead(BetaHeadConfig(hidden_size=4, w_init=0.3))
    assert head.w.shape == (1,)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["w"] = torch.tensor(0.7)  # the old layout
    head.load_state_dict(state)
    assert head.w.shape == (1,) and float(head.w.detach()) == pytest.approx(0.7)
    prior = BetaHead(BetaHeadConfig(hidden_size=4, w_init=0.3, w_prior_weight=2.0))
    with torch.no_grad():
        prior.w.fill_(0.6)
    assert prior.regularization_loss().shape == () and float(prior.regularization_loss().detach()) == pytest.approx(
        2.0 * math.log(2.0) ** 2)


def test_log_w_param_formula_gradient_auto_init_and_prior():
    """w_param=log trains log w: the same β as a linear w of the same value, the chain-rule gradient
    d/d(log w) = w · d/dw, auto init through log w, and the prior (log w − log w_init)² on it directly."""
    linear = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.07, epsilon=0.3, init_std=0.5))
    log = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.07, epsilon=0.3, init_std=0.5, w_param="log"))
    log.context_net.load_state_dict(linear.context_net.state_dict())
    assert [n for n, _ in log.named_parameters() if "net" not in n] == ["log_w"] and "w" not in log.state_dict()
    h, log_ppl = inputs()
    beta_lin, beta_log = linear(h, log_ppl=log_ppl), log(h, log_ppl=log_ppl)
    torch.testing.assert_close(beta_log, beta_lin, rtol=1e-6, atol=1e-8)
    beta_lin.sum().backward()
    beta_log.sum().backward()
    torch.testing.assert_close(log.log_w.grad, 0.07 * linear.w.grad, rtol=1e-5, atol=1e-9)

    auto = BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", target_beta=0.25, epsilon=0.3, w_param="log"))
    assert auto(h, log_ppl=log_ppl).mean().item() == pytest.approx(0.25, rel=1e-5)
    w0 = float(auto.current_w().detach())
    assert float(auto.w_init_value) == pytest.approx(w0, rel=1e-6) and float(auto.log_w.detach()) == pytest.approx(math.log(w0))
    fresh = BetaHead(BetaHeadConfig(hidden_size=H, w_init="auto", target_beta=0.25, epsilon=0.3, w_param="log"))
    fresh.load_state_dict(auto.state_dict())  # resume keeps the initialised log w
    assert bool(fresh.w_initialized) and float(fresh.current_w().detach()) == pytest.approx(w0, rel=1e-6)

    prior = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.1, w_prior_weight=2.0, w_param="log"))
    with torch.no_grad():
        prior.log_w.fill_(math.log(0.4))
    assert prior.regularization_loss().item() == pytest.approx(2.0 * math.log(4.0) ** 2, rel=1e-5)
    prior.regularization_loss().backward()
    assert prior.log_w.grad.item() == pytest.approx(2 * 2.0 * math.log(4.0), rel=1e-5)


def test_log_w_param_survives_the_adam_trap_that_sends_linear_w_through_zero():
    """The trap of scale (module docstring): Adam steps ≈ lr whatever the gradient, so a w of 0.008 (w_init=auto on
    a random 151k-vocabulary model) pushed down for 20 steps at lr 1e-3 crosses 0 and every β sits at beta_min;
    under w_param=log the same 20 steps move w by ≈ 2 % of itself."""
    h, log_ppl = inputs()
    ends = {}
    for param in ("linear", "log"):
        head = BetaHead(BetaHeadConfig(hidden_size=H, w_init=0.008, epsilon=0.0, w_param=param))
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
        for _ in range(20):
            opt.zero_grad()
            head(h, log_ppl=log_ppl).sum().backward()  # a gradient that always asks for a smaller β
            opt.step()
        ends[param] = (float(head.current_w().detach()), head(h, log_ppl=log_ppl).detach())
    w_lin, beta_lin = ends["linear"]
    assert w_lin < 0 and torch.all(beta_lin == 1e-4)  # clamped at beta_min: no gradient can bring it back
    w_log, beta_log = ends["log"]
    assert w_log == pytest.approx(0.008 * math.exp(-20 * 1e-3), rel=1e-3)
    torch.testing.assert_close(beta_log, w_log * log_ppl, rtol=1e-5, atol=1e-9)
