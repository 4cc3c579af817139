"""The one place where per-batch DPO metrics are computed from per-pair values.

The training loop gathers per-pair tensors across processes first and then calls
:func:`preference_metrics`, so std/min/max are exact under data parallelism; evaluation calls it per
domain on the subset of pairs of that domain.
"""

from __future__ import annotations

from typing import Mapping

import torch
from .errors import LbdpoError


def _stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    x = x.detach().float()
    return {
        f"{prefix}/mean": x.mean().item(),
        f"{prefix}/std": x.std(unbiased=False).item() if x.numel() > 1 else 0.0,
        f"{prefix}/min": x.min().item(),
        f"{prefix}/max": x.max().item(),
    }


def preference_metrics(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Scalar metrics of a batch of preference pairs.

    Args:
        values: per-pair (B,) tensors with keys ``losses``, ``chosen_rewards``, ``rejected_rewards``,
            ``policy_chosen_logps``, ``policy_rejected_logps``, ``beta``, ``log_ppl``, and optionally
            ``f`` (the BetaHead's context factor).

    Returns:
        ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``,
        ``beta/{mean,std,min,max}``, ``log_ppl/{mean,std}``, ``beta_head/{f_mean,f_std}`` as floats.
        ``rewards/accuracies`` counts a pair as correct when its chosen reward is strictly larger.
    """
    chosen = values["chosen_rewards"].detach().float()
    rejected = values["rejected_rewards"].detach().float()
    out = {
        "loss": values["losses"].detach().float().mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "rewards/accuracies": (chosen > rejected).float().mean().item(),
        "logps/chosen": values["policy_chosen_logps"].detach().float().mean().item(),
        "logps/rejected": values["policy_rejected_logps"].detach().float().mean().item(),
    }
    out.update(_stats("beta", values["beta"]))
    log_ppl = _stats("log_ppl", values["log_ppl"])
    out["log_ppl/mean"], out["log_ppl/std"] = log_ppl["log_ppl/mean"], log_ppl["log_ppl/std"]
    if "f" in values:
        f = _stats("f", values["f"])
        out["beta_head/f_mean"], out["beta_head/f_std"] = f["f/mean"], f["f/std"]
    if "log_ppl_approx" in values:
        out.update(ppl_approx_metrics(values))
    if "kept" in values:  # β-DPO's filtering
        out["beta_dpo/kept_fraction"] = values["kept"].float().mean().item()
    return out


def ppl_approx_metrics(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How well the head's ℓ̂ approximates log PPL: ``ppl_approx/mae``, ``ppl_approx/r2`` (1 − SS_res/SS_tot over
    these pairs), and ``ppl_approx/spearman_beta``, the rank correlation of the β used with the β the exact
    log PPL would give."""
    exact, approx = values["log_ppl"].double(), values["log_ppl_approx"].double()
    ss_tot = ((exact - exact.mean()) ** 2).sum()
    out = {"ppl_approx/mae": (approx - exact).abs().mean().item(),
           "ppl_approx/r2": (1 - ((approx - exact) ** 2).sum() / ss_tot).item() if ss_tot > 0 else float("nan")}
    if "beta_exact" in values:
        out["ppl_approx/spearman_beta"] = spearman(values["beta"], values["beta_exact"])
    return out


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two (N,) tensors (ranks by order; NaN with fewer than 2 values or no spread)."""
    if x.numel() < 2:
        return float("nan")
    rx, ry = x.double().argsort().argsort().double(), y.double().argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return (rx @ ry).item() / denom if denom > 0 else float("nan")


def split_by_domain(values: Mapping[str, torch.Tensor], domains: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The per-pair tensors of each domain, in sorted domain order. ``domains`` has one label per pair."""
    n = len(next(iter(values.values())))
    if len(domains) != n:
        raise LbdpoError(f"{len(domains)} domain labels for {n} pairs")
    out = {}
    for domain in sorted(set(domains)):
        idx = torch.tensor([d == domain for d in domains])
        out[domain] = {k: v[idx] for k, v in values.items()}
    return out


def metrics_by_domain(values: Mapping[str, torch.Tensor], domains: list[str]) -> dict[str, dict[str, float]]:
    """:func:`preference_metrics` of each domain's pairs. ``domains`` has one entry per pair."""
    return {domain: preference_metrics(sub) for domain, sub in split_by_domain(values, domains).items()}
